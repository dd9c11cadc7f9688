"""Orchestration around the Perfusion core: the CLI today; manifests, storage, index, Ray fan-out next.

Uses perfusion/ only through its public API (`import perfusion`).
"""
