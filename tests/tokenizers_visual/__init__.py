"""Tests of the visual tokenizers `mmreduce.tokenizers_visual` (SEED, TokenUnify, VQ, their CLI)."""
