"""Recipes: end-to-end runs built from the trainer's CLI (``demo``: the embedded CPU default;
``variants``: the paper's comparison). ``common`` holds what both use."""
