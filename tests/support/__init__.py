"""Test rigs: webhook receiver, simulator handle, processes, fault rig, history factory."""
