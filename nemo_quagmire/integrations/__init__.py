"""Adapters to other training frameworks (the only modules that import them): Lightning / NeMo 2 callbacks.

Import the adapter module itself (`nemo_quagmire.integrations.lightning`); this package imports nothing, so
the rest of nemo-quagmire never loads a framework it does not need.
"""
