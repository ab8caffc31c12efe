"""All Redis access, read-only by design: nothing here writes the backend's keys.

`keys` names the backend's keys and builds every SCAN pattern; `client` connects, bounds
each request's Redis work by the budget and sorts failed replies; `facts` finds a
conversation's runs and reads their facts.
"""
