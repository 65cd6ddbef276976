"""Uniform access to the parts of a Llama-family model that importance and pruning touch."""

from torch import nn
from transformers import PreTrainedModel


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.model.layers


def final_norm(model: PreTrainedModel) -> nn.Module:
    return model.model.norm
