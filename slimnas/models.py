"""`import slimnas.models`: the one import that lets transformers load slimnas's per-layer (heterogeneous) students.

It registers a config class and a causal LM per family (`slimnas_llama`, `slimnas_mistral`, `slimnas_qwen2`,
`slimnas_qwen3`) with AutoConfig and AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(dir)` builds
each layer from `config.per_layer_config[i]`, with no remote code. The modeling is compress/modeling.py; a bare
`import slimnas` loads neither torch nor transformers.
"""

from slimnas.compress.modeling import PER_LAYER_MODELS, per_layer_config

__all__ = ["PER_LAYER_MODELS", "per_layer_config"]
