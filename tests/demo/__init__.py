"""Tests of the Gradio demo `mmreduce.demo`: its functions, its API, and the page in a headless browser."""
