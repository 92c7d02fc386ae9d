"""Agents and model backends that run on HPC nodes."""
