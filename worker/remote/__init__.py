"""Talking to remote APIs safely: the network policy, timing rules and reading answers.

Shared by the poller, the outbox (completion callbacks) and the edge (incoming callbacks).
"""
