"""slimnas report (placeholder until the report package lands)."""


def main(cfg) -> None:
    raise NotImplementedError
