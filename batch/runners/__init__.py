"""Runners: what drives the engine on one machine or across a cluster."""
