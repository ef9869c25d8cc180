"""Runners: what drives the engine on one machine or across a cluster, and the run mode
that hands jobs to the providers' batch APIs instead."""
