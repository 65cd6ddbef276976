"""Benchmark: is a per-layer student as fast per FLOP as a uniform one of equal parameters, in PyTorch and llama.cpp?

    python scripts/per_layer_speed.py [--teacher smollm2-135m --repeats 4 --new-tokens 32]

Two pairs of students of the default teacher, each pair at equal parameters (within 1%):
  depth:  a uniform student with 20 of 30 layers against a per-layer one that keeps all 30 layers but removes the
          attention of every third layer and narrows the FFNs (Puzzle's kind of cut);
  widths: a uniform FFN width against alternating narrow and wide FFNs, 3 or 1 KV groups (of the 3) per layer.
Speed does not depend on the weights, so the students are random models of their shapes (the teacher's
tokenizer, so llama.cpp loads them). Each student is timed against the teacher in ABBA blocks (student, teacher,
teacher, student), as `slimnas bench` does, with bench.speed.compare_speed in both engines: PyTorch (fp32 here)
and llama.cpp (speed.engine=llamacpp: f16 GGUFs, greedy decode with its KV cache); one block gives one decode
speed-up. The table divides each decode speed-up by the FLOPs reduction: 1.0 means the student is as fast as its
FLOPs allow relative to the teacher. Only ratios taken in one run on a quiet machine mean anything (load is printed).
"""

import argparse
import statistics
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from slimnas.bench.settings import SpeedSettings
from slimnas.bench.speed import compare_speed
from slimnas.compress.arch import (
    Architecture,
    LayerShape,
    PerLayerArchitecture,
    Shape,
    flops_per_token,
    param_count,
    pruned_config,
)
from slimnas.compress.models import DEFAULT_TEACHER, load_model
from slimnas.core.device import cpu_load
from slimnas.models import per_layer_config


def pairs(teacher: PretrainedConfig) -> dict[str, tuple[Architecture, PerLayerArchitecture]]:
    """(uniform, per-layer) at equal parameters, for the default teacher's 30 layers of 9 heads in 3 KV groups."""
    hidden, heads, kv, layers = (teacher.hidden_size, teacher.num_attention_heads, teacher.num_key_value_heads,
                                 teacher.num_hidden_layers)  # fmt: skip
    no_attention = [LayerShape(640 + 64 * (i % 2), 0, 0) if i % 3 == 2 else LayerShape(640 + 64 * (i % 2), heads, kv)
                    for i in range(layers)]  # fmt: skip
    widths = [LayerShape(512 if i % 2 else 1088, heads, kv if i % 2 else kv // 3) for i in range(layers)]
    return {
        "depth": (
            Architecture(hidden, 1024, heads, kv, layers * 2 // 3),
            PerLayerArchitecture(hidden, tuple(no_attention)),
        ),
        "widths": (Architecture(hidden, 768, heads, kv, layers), PerLayerArchitecture(hidden, tuple(widths))),
    }


def student(teacher: PretrainedConfig, shape: Shape) -> torch.nn.Module:
    config = (
        per_layer_config(teacher, shape)
        if isinstance(shape, PerLayerArchitecture)
        else pruned_config(teacher, shape, list(range(shape.num_hidden_layers)))
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)

    loaded = load_model(args.teacher)
    teacher, config = loaded.model.eval(), loaded.model.config
    settings = SpeedSettings(
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, precision="fp32"
    )
    print(
        f"teacher {args.teacher}: {param_count(config) / 1e6:.2f}M parameters; load per core at start {cpu_load():.2f}"
    )
    rows = []
    for pair, shapes in pairs(config).items():
        for kind, shape in zip(("uniform", "per-layer"), shapes, strict=True):
            model, name = student(config, shape), f"{pair} {kind}"
            flops = flops_per_token(config, args.prompt_len) / flops_per_token(config, args.prompt_len, shape)
            torch_speed = compare_speed(model, teacher, settings, name)
            cpp = compare_speed(model, teacher, replace(settings, engine="llamacpp"), name, tokenizer=loaded.tokenizer)
            rows.append((pair, kind, param_count(config, shape), flops, torch_speed, cpp))
            print(f"  timed {name} (load per core {cpu_load():.2f})", flush=True)

    print(f"\nload per core at the end {cpu_load():.2f}; decode speed-up over the teacher, mean ± SE over "
          f"{args.repeats} ABBA blocks; prompt {args.prompt_len}, {args.new_tokens} new tokens, batch 1")  # fmt: skip
    print("| pair | student | params | FLOPs reduction | PyTorch fp32 | per FLOP | llama.cpp f16 | per FLOP |")
    print("|---|---|---|---|---|---|---|---|")
    for pair, kind, params, flops, torch_speed, cpp in rows:
        speedup, se = torch_speed.decode_speedup, torch_speed.decode_speedup_stderr
        print(f"| {pair} | {kind} | {params / 1e6:.2f}M | {flops:.3f}x | {speedup:.3f} ± {se:.3f} "
              f"| {speedup / flops:.2f} | {cpp.decode_speedup:.3f} ± {cpp.decode_speedup_stderr:.3f} "
              f"| {cpp.decode_speedup / flops:.2f} |")  # fmt: skip
    per_flop = {
        kind: statistics.mean(r[4].decode_speedup / r[3] for r in rows if r[1] == kind)
        for kind in ("uniform", "per-layer")
    }
    print(f"mean PyTorch speed-up per FLOP: uniform {per_flop['uniform']:.2f}, per-layer {per_flop['per-layer']:.2f}")


if __name__ == "__main__":
    main()
