# IV.E Mise en place d'une dernière volonté -- adapted: host/port/credentials
# from argv. Sets a Last Will, connects and, once connected, waits to be killed
# ("un arrêt brutal de votre client"); with --disconnect it leaves cleanly instead.
import threading
import time

import paho.mqtt.client as mqtt

import common

def extra(p):
    p.add_argument("--disconnect", action="store_true")

a = common.args("E: last will", extra)
MQTT_LAST_WILL_TOPIC = "isima/" + a.gx + "/LWT"
MQTT_LAST_WILL_MSG = a.gx + " Lost Connection"
connected = threading.Event()

def on_connect(client, userdata, flags, rc):
    print("Connected with result code => "+mqtt.connack_string(rc))
    connected.set()

client = mqtt.Client()
client.will_set(topic = MQTT_LAST_WILL_TOPIC, payload = MQTT_LAST_WILL_MSG, qos = 0,
retain = False)
client.on_connect = on_connect
client.username_pw_set(username=a.username, password=a.password)
client.connect(a.host, a.port)
client.loop_start()
if not connected.wait(10):
    raise SystemExit("no CONNACK")
if a.disconnect:
    client.disconnect()
    client.loop_stop()
    print("-- disconnected")
else:
    print("-- waiting to be killed")
    while True:
        time.sleep(1)
