"""The Lightning shell around the merge math: coefficients as the only trainable parameters."""
