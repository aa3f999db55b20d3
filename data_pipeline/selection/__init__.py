"""Data selections that reproduce a published paper's choice of training rows from a raw dataset (docs/protocol.md)."""
