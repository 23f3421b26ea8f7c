"""How Axon processes start and find each other: environment detection, torch.distributed
initialization, local worker spawning and the process `Grid` (the only place groups are made)."""
