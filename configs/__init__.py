"""The demo pipeline config, shipped with cptflow as package data (`cptflow demo DIR` writes it out)."""
