"""Evaluation of checkpoints. `evaluate` is the entry (teacher-forced numbers on every
eval set, then the corpus's own extras); `generate` turns prompts into completions;
`verbs`, `text` and `chat` hold each corpus's extras; `floor` and `ngram` the
baselines; `audit` the leak probes. The package itself imports nothing, so a module
of it can be imported without loading the others."""
