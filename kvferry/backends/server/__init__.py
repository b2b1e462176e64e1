"""kvferry's own store server (service) and the tier that talks to it (client).

Importing this package imports neither: ``kvferry.backends.server.service`` pulls in the
transfer engine, ``client`` the client side.
"""
