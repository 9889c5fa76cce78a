"""`make bench`: a load generator that places concurrent call pairs through a real server and measures the relay."""
