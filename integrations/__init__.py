"""Thin integrations per ecosystem, installed as ``tying.integrations``; each imports its library lazily."""
