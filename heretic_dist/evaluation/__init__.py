"""`evaluate-front`: the search's finalists measured on held-out sets, with a refusal judge (judges/)."""
