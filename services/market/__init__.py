"""The task market: contract-net auctions over the network."""
