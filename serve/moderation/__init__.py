"""Moderation: rules, lexicon and a learned classifier (optionally a guard model) behind a
Ray Serve deployment that the gateway calls on every input and on generated output."""
