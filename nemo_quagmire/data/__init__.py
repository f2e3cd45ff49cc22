"""Datasets: the embedded synthetic arithmetic task and prompt/response loaders."""
