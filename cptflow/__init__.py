"""cptflow: continued pretraining of LLMs as a Prefect DAG
(clean → quality → perplexity → mix → tokenize → cpt → sft → evaluate)."""

__version__ = "0.1.0"
