"""lm-eval's own wikitext functions, so the local task detokenises and counts words exactly as lm-eval does."""

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

__all__ = ["process_results", "wikitext_detokenizer"]
