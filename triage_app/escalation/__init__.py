"""Escalation: what leaves the device for the central server, and the checks before it does.

``phi_gate`` is the last, independent check on every outbound payload. The envelope, outbox and
uploader follow (DESIGN 4.4).
"""
