"""Evaluation: the one scorer (perplexity, KL and top-1 agreement against a reference)."""

from lowbit.eval.perplexity import (SCORES, KLResult, PerplexityResult, ReferenceScorer, kl_divergence,
                                    perplexity, position_sums, summarize_sums)

__all__ = ["SCORES", "KLResult", "PerplexityResult", "ReferenceScorer", "kl_divergence", "perplexity",
           "position_sums", "summarize_sums"]
