"""Does ranking on many documents change the pick? A search's kept checkpoints, scored two ways.

    slimnas search preset=cpu run_dir=runs/demo search.keep_checkpoints=true   # or slimnas pipeline
    python scripts/heldout_documents.py runs/demo

Every checkpoint the run kept (trials/NNNN/model: the candidates that reached the last rung) is scored on
  rows      the old selection set: the first `--rows` consecutive 128-token rows of the selection documents
            packed end to end, as slimnas ranked candidates before held-out sets were drawn across
            documents (with `preset=cpu`: 16 rows, all inside one Wikipedia article); its standard error
            treats the rows as independent, as it did then;
  documents the run's own selection set: one row at a seeded position in each of `data.selection_docs`
            documents; standard errors over documents.
It prints both rankings, their Spearman correlation, whether the pick (the lowest KL) changes, and one
candidate's KL with its standard error under each; the table also goes to RUN_DIR/heldout_documents.json.
"""

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

from slimnas.compress.corpus import load_corpus, load_documents, pack
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.models import load_model
from slimnas.compress.settings import DataSettings
from slimnas.core.errors import SlimnasError
from slimnas.core.files import write_json
from slimnas.core.tables import format_table, plus_minus

OLD_ROW_TOKENS = 128  # the old held-out rows were seq_len long


def old_selection_rows(corpus_source: str, selection_ids: list[str], tokenizer, n_rows: int):
    """The first n_rows rows of the selection documents packed end to end (the old selection set)."""
    documents = load_documents(corpus_source)
    text_of = dict(zip(documents.ids, documents.texts, strict=True))
    tokens = tokenizer([text_of[i] for i in selection_ids], add_special_tokens=False)["input_ids"]
    rows = pack(tokens, tokenizer.eos_token_id, OLD_ROW_TOKENS)[:n_rows]
    lengths, spanned, total = [len(t) + 1 for t in tokens], 0, 0
    while total < n_rows * OLD_ROW_TOKENS:  # how many documents those rows touch
        total, spanned = total + lengths[spanned], spanned + 1
    return rows, spanned


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rows", type=int, default=16, help="old selection rows (preset=cpu used 16)")
    args = parser.parse_args(argv)
    run = json.loads((args.run_dir / "run.json").read_text())
    checkpoints = sorted(args.run_dir.glob("trials/*/model"))
    if len(checkpoints) < 2:
        raise SlimnasError(f"{args.run_dir} kept {len(checkpoints)} checkpoints: run with search.keep_checkpoints=true")

    settings = run["settings"]
    teacher = load_model(run["teacher"])
    corpus = load_corpus(teacher.tokenizer, DataSettings(**settings["data"]))
    old_rows, spanned = old_selection_rows(
        corpus.source, corpus.document_ids["selection"], teacher.tokenizer, args.rows
    )
    sets = {
        "rows": HeldoutSet("old rows", old_rows, teacher.model, settings["precision"]),
        "documents": HeldoutSet("selection documents", corpus.selection, teacher.model, settings["precision"]),
    }
    results = []
    for path in checkpoints:
        record = json.loads((path.parent / "record.json").read_text())
        student = load_model(str(path)).model
        scores = {name: heldout.evaluate(student) for name, heldout in sets.items()}
        results.append(
            {
                "trial": record["trial"],
                "candidate": record["label"],
                "params": record["params"],
                "kd_tokens": record["rungs"][-1]["kd_tokens"],
                **{f"kl_{name}": s.kl for name, s in scores.items()},
                **{f"kl_{name}_stderr": s.kl_stderr for name, s in scores.items()},
            }
        )
        shown = ", ".join(f"{name} {plus_minus(s.kl, s.kl_stderr)}" for name, s in scores.items())
        print(f"trial {record['trial']}: {shown}", flush=True)

    rho = float(spearmanr([r["kl_rows"] for r in results], [r["kl_documents"] for r in results]).statistic)
    picks = {name: min(results, key=lambda r: r[f"kl_{name}"])["candidate"] for name in sets}
    one = min(results, key=lambda r: r["kl_documents"])
    summary = {
        "old_rows": {"rows": len(old_rows), "tokens": old_rows.numel(), "documents_spanned": spanned},
        "documents": {"documents": corpus.documents("selection"), "tokens": corpus.selection.numel()},
        "spearman": rho,
        "pick_rows": picks["rows"],
        "pick_documents": picks["documents"],
        "pick_changes": picks["rows"] != picks["documents"],
        "stderr_of": one["candidate"],
        "stderr_rows": one["kl_rows_stderr"],
        "stderr_documents": one["kl_documents_stderr"],
        "candidates": results,
    }
    write_json(args.run_dir / "heldout_documents.json", summary)
    table = [
        {
            "trial": r["trial"],
            "candidate": r["candidate"],
            "KD tokens": r["kd_tokens"],
            f"KL, {len(old_rows)} rows of {spanned} document(s)": plus_minus(r["kl_rows"], r["kl_rows_stderr"]),
            f"KL, {corpus.documents('selection')} documents": plus_minus(r["kl_documents"], r["kl_documents_stderr"]),
        }
        for r in sorted(results, key=lambda r: r["kl_documents"])
    ]
    print(format_table(table, list(table[0])))
    print(
        f"Spearman {rho:.2f} over {len(results)} candidates; pick on rows {picks['rows']}, on documents "
        f"{picks['documents']} ({'changes' if summary['pick_changes'] else 'same'}); standard error of "
        f"{one['candidate']}'s KL: {one['kl_rows_stderr']:.4f} on rows, {one['kl_documents_stderr']:.4f} on documents"
    )


if __name__ == "__main__":
    main()
