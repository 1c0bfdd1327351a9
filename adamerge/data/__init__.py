"""Tasks: labelled image datasets with class names and prompt templates."""
