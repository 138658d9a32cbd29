"""The domain: message contracts and the pure rules around them.

Nothing here imports the store, the stream or the API.
"""
