"""The sample corpora and instruction data of `make demo`, shipped with cptflow as package data (see README.md here)."""
