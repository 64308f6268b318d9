"""Federated adapter learning across a fleet (issue "Federated PEFT with Flower"): aggregation first."""
