"""What the driver and the agents share: the job on the wire, the batch format, the settings
and their declarations, objectives, optimisers, devices and how a network is rebuilt.
Both sides import these modules; they import neither side."""
