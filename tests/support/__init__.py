"""Helpers the tests import: tiny random-weight VLMs (vlm_factory), the masked reference (masked_reference)."""
