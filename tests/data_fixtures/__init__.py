"""Helpers that fabricate tiny image datasets on disk for the data tests."""
