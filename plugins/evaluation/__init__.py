"""Built-in evaluation plugins: the refusal judge and the stages the baselines are made of."""
