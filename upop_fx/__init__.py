"""upop_fx: structured pruning of Transformer models (UPop) as a compiler pipeline over FX graphs."""
