"""Segment ids: which part of the prompt each token belongs to.

A `(B, L)` integer tensor labels every token:

    CONTEXT = 0   instruction text before the first item, and the response header
    1 .. n        the tokens of history item k (title, quotes and separator), oldest item = 1
    TARGET = -2   the answer (target title + end token) and every generated token
    PAD = -1      padding

Kept in its own tiny module so that the data pipeline and the attention package share the
vocabulary without importing each other.
"""

CONTEXT: int = 0
PAD: int = -1
TARGET: int = -2
