"""What a run leaves: results.json, the report (HTML and Markdown) and run comparisons."""
