"""The release record: what was released, on what evidence, and why it was decided."""
