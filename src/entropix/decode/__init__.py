"""The host side of decoding: engine, records, stops, strategies."""
