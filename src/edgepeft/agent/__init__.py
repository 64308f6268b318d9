"""The device's update agent (``edgepeft agent``): it runs beside a device runtime, fetches the adapters the fleet
server assigns to this device through TUF, installs them through the runtime's HTTP API and reports state and
health. Device side: it never imports the fleet server, torch or the runtime's internals."""
