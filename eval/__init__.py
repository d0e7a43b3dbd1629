"""Verification on InsightFace .bin sets."""
