"""The simulator's rooms: the plan, the traffic it makes, the HTTP client, the sender processes, the tally.

`callstream.simulate` puts them together; code outside the simulator imports that module only.
"""
