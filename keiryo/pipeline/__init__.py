"""Recipes (ordered steps) and the runner that turns a model into measured candidates."""

from keiryo.pipeline.recipe import BUILTIN_RECIPES, Recipe, Step, load_recipe
from keiryo.pipeline.runner import RunOptions, compress, run_recipe

__all__ = ["BUILTIN_RECIPES", "Recipe", "RunOptions", "Step", "compress", "load_recipe", "run_recipe"]
