"""Fixtures for the tests in this folder.

The session-wide settings (offline, CPU, one torch thread) and the fixtures the docs' code blocks
use (`fake_hub`, `llava_data`, `finished_run`) live in the repository's root conftest.py, which
pytest loads before this one, so that they also reach README.md and docs/.
"""
