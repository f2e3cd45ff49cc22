"""The study: SFT variants -> proxies -> GRPO from each -> which proxy predicted the post-RL ranking.

`plan` (the variants and budgets as data, and the jobs they make), `runner` (stage markers, resume, the
worker pool), `launchers` (local processes, Slurm through submitit), `results` (summary, ranking, the
consistency check). `scripts/quagmire_study.py` is the command; docs/study.md the guide.
"""
