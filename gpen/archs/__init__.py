"""The networks, pure: each module holds one architecture and the spec that says what it is."""
