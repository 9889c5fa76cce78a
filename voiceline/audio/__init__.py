"""Media: RTP endpoints, G.711, hold audio and the bridge between two legs."""
