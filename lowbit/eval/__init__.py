"""Evaluation: perplexity and KL divergence against a reference model."""

from lowbit.eval.perplexity import KLResult, PerplexityResult, kl_divergence, perplexity

__all__ = ["KLResult", "PerplexityResult", "kl_divergence", "perplexity"]
