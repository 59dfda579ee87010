"""iamrec: the Item-aware Attention Mechanism (IAM) for LLM-based recommendation."""

__version__ = "0.1.0"
